//! The IAM identity of a Function URL request (feature `lambda-http`), for
//! [`crate::Authenticator::authenticate`].

use crate::IamIdentity;
use lambda_http::request::RequestContext;
use lambda_http::{Request, RequestExt};

/// The principal that signed `request`, as the Function URL's `AWS_IAM` auth reports it in
/// `requestContext.authorizer.iam`; `None` when it reports none (the URL's auth is `NONE`, or
/// the request came through the local stack).
pub fn iam_identity(request: &Request) -> Option<IamIdentity> {
    match request.request_context_ref()? {
        RequestContext::ApiGatewayV2(context) => {
            let iam = context.authorizer.as_ref()?.iam.as_ref()?;
            let user_arn = iam.user_arn.clone().filter(|arn| !arn.is_empty())?;
            Some(IamIdentity { user_arn, account_id: iam.account_id.clone() })
        }
        _ => None,
    }
}
