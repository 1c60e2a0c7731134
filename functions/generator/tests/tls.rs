//! The OpenAI-compatible client over HTTPS: rustls with the AWS SDK's aws-lc-rs, trusting the
//! system's roots (here a throwaway CA named by `SSL_CERT_FILE`, as a deployment's trust store
//! would be). A test binary of its own because it sets a process-wide variable.

use chat_core::Role;
use chat_testkit::fake_llm::{self, FakeLlm};
use futures::StreamExt;
use generator::llm::openai::OpenAiSettings;
use generator::llm::{Model, OpenAi, Prompt, RetryPolicy};
use std::sync::Arc;
use std::time::Duration;

fn openai(base_url: String) -> Model {
    let settings = OpenAiSettings {
        base_url,
        api_key: Some("sk-tls".to_owned()),
        model: "m".to_owned(),
        temperature: None,
        max_tokens: 16,
        max_tokens_field: "max_tokens",
        connect_timeout: Duration::from_secs(2),
        stream_usage: true,
    };
    let policy = RetryPolicy { max_attempts: 1, ..RetryPolicy::default() };
    Model::new(Arc::new(OpenAi::new(settings).expect("client")), policy)
}

#[tokio::test]
async fn https_endpoints_are_trusted_through_the_system_roots_and_nothing_else() {
    let trusted = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let roots = std::env::temp_dir().join(format!("chat-tls-roots-{}.pem", std::process::id()));
    std::fs::write(&roots, trusted.cert.pem()).unwrap();
    std::env::set_var("SSL_CERT_FILE", &roots);

    let acceptor = |cert: &rcgen::CertifiedKey| {
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    };
    let prompt = || Prompt { messages: vec![(Role::User, "hi".to_owned())], ..Prompt::default() };

    let good = FakeLlm::start_tls(
        vec![fake_llm::openai_reply(&["secure", " ✓"], Duration::ZERO)],
        acceptor(&trusted),
    )
    .await
    .unwrap();
    assert!(good.url.starts_with("https://"));
    let out: Vec<_> = openai(format!("{}/v1", good.url)).stream(prompt()).collect().await;
    let tokens = |t: &str| Ok(generator::llm::Output::Token(t.to_owned()));
    assert_eq!(out[..2], [tokens("secure"), tokens(" ✓")]);
    assert!(matches!(out[2..], [Ok(generator::llm::Output::Usage(_))]), "{out:?}");
    assert_eq!(good.requests()[0].header("authorization"), Some("Bearer sk-tls"));

    // A server whose certificate no trusted root signed is refused before any request is sent.
    let bad =
        FakeLlm::start_tls(vec![fake_llm::openai_reply(&["leak"], Duration::ZERO)], acceptor(&stranger))
            .await
            .unwrap();
    let out: Vec<_> = openai(format!("{}/v1", bad.url)).stream(prompt()).collect().await;
    assert!(matches!(&out[..], [Err(e)] if e.message.contains("could not reach")), "{out:?}");
    assert!(bad.requests().is_empty(), "nothing was sent to an untrusted server");
    let _ = std::fs::remove_file(&roots);
}
