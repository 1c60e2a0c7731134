//! The test directives (`DEMO_FAULTS`), written into a user's message to make the generator fail
//! on purpose, so the end-to-end tests can watch recovery: `[[crash-after:N]]` aborts the
//! process once N tokens are stored, on a first claim only (a crashed generator);
//! `[[lose-delivery]]` acknowledges every delivery of the turn without claiming it (a lost
//! queue message). Release builds carry none of them.

use crate::llm::{directive, Prompt};
use chat_core::config::ConfigError;
use chat_core::job::TurnMessage;
use chat_core::{Read, Role, Store, StoreError};
use tracing::warn;

/// Whether this build carries the test directives (`DEMO_FAULTS`): debug builds, which the local
/// stack and the tests run, do; release builds, which are deployed, do not. Every directive
/// check is `FAULTS_BUILT && …`, so a release build compiles them away.
pub const FAULTS_BUILT: bool = cfg!(debug_assertions);

/// `DEMO_FAULTS` as asked, refused in a build without the directives rather than ignored.
pub fn faults_setting(requested: bool, built: bool) -> Result<bool, ConfigError> {
    if requested && !built {
        return Err(ConfigError {
            variable: "DEMO_FAULTS".to_owned(),
            problem: "is for test builds only: this release binary carries no test directives".to_owned(),
        });
    }
    Ok(requested && built)
}

/// `[[lose-delivery]]`: the turn's message asks that every delivery be acknowledged unclaimed, as
/// if the queue had lost them, so the sweeper's re-drives and its final timeout can be seen end
/// to end.
pub(crate) async fn delivery_lost(
    store: &Store,
    faults: bool,
    message: &TurnMessage,
) -> Result<bool, StoreError> {
    if !(FAULTS_BUILT && faults) {
        return Ok(false);
    }
    let user = store.get_message(message.session_id, message.turn, Role::User, Read::Consistent).await?;
    Ok(user.is_some_and(|m| m.content.contains("[[lose-delivery]]")))
}

/// `[[crash-after:N]]`: after how many stored tokens this attempt aborts, if it does (a first
/// claim only, so the takeover that follows finishes the turn).
pub(crate) fn crash_after(prompt: &Prompt, faults: bool, first_claim: bool) -> Option<usize> {
    directive(prompt, "crash-after").filter(|_| FAULTS_BUILT && faults && first_claim)
}

/// Aborts the process once `stored` tokens reach [`crash_after`]'s count.
pub(crate) fn crash_if_due(crash_after: Option<usize>, stored: u64) {
    if crash_after.is_some_and(|n| stored as usize >= n) {
        warn!("crashing on purpose ([[crash-after]] test directive)");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_directives_are_refused_by_a_build_without_them_and_off_unless_asked() {
        assert!(faults_setting(true, false).unwrap_err().problem.contains("test builds only"));
        assert_eq!(faults_setting(false, false), Ok(false));
        assert_eq!(faults_setting(false, true), Ok(false));
        assert_eq!(faults_setting(true, true), Ok(true));
    }
}
