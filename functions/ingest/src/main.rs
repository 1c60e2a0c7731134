use lambda_http::{run, service_fn, Error, Request};

#[tokio::main]
async fn main() -> Result<(), Error> {
    chat_core::aws::init_tracing();
    let app = chat_core::aws::started(ingest::App::from_env().await)?;
    let app = &app;
    run(service_fn(move |request: Request| async move { Ok::<_, Error>(app.handle(request).await) })).await
}
