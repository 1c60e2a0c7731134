use lambda_http::{run_concurrent, service_fn, Error, Request};
use std::sync::Arc;

fn main() -> Result<(), Error> {
    chat_runtime::aws::apply_local_concurrency();
    serve()
}

#[tokio::main]
async fn serve() -> Result<(), Error> {
    chat_runtime::aws::init_tracing();
    let app = Arc::new(chat_runtime::aws::started(ingest::App::from_env().await)?);
    run_concurrent(service_fn(move |request: Request| {
        let app = app.clone();
        async move { Ok::<_, Error>(app.handle(request).await) }
    }))
    .await
}
