use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    chat_core::aws::init_tracing();
    let generator = chat_core::aws::started(generator::Generator::from_env().await)?;
    let generator = &generator;
    run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<_, Error>(generator.handle(event.payload).await)
    }))
    .await
}
