//! Micro-benchmarks of the pure functions every message goes through, so a refactor that
//! slows one shows: the depth check before decoding (beside the decoding it guards),
//! message → POST request, the verdict on an answer, the settlement table, and the Standard
//! Webhooks signature. `cargo bench --bench hot_path`; under `cargo test`
//! each runs once.

use divan::{Bencher, black_box};
use fe2o3_amqp::types::messaging::message::__private::Serializable;
use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use hot_potato::amqp::depth;
use hot_potato::config::Config;
use hot_potato::delivery::dispatcher::DeliveryOutcome;
use hot_potato::delivery::request::PushRequest;
use hot_potato::delivery::signing::signature;
use hot_potato::delivery::verdict::verdict;
use hot_potato::enrollment::outcome::FailureOutcome;
use hot_potato::enrollment::settings::DeliverySettings;
use hot_potato::pipeline::settle::disposition;
use reqwest::header::HeaderValue;

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test` (which may pass libtest flags such as
    // `--test-threads` that divan does not know) each benchmark runs once, as a smoke test.
    if std::env::args().any(|a| a == "--bench") {
        divan::main();
    } else {
        divan::Divan::default().test_benches();
    }
}

/// A 256-byte Data message with the properties a typical producer sets.
fn message() -> Message<Body<Value>> {
    let mut app = ApplicationProperties::default();
    app.0
        .insert("tenant".into(), SimpleValue::String("acme".into()));
    app.0.insert("priority".into(), SimpleValue::Int(7));
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some("order-000123".to_string().into()),
            correlation_id: Some("corr-9".to_string().into()),
            content_type: Some("application/json".into()),
            ..Default::default()
        }),
        application_properties: Some(app),
        body: Body::Data(vec![Data(Binary::from(vec![b'x'; 256]))].into()),
        footer: None,
    }
}

/// A message whose body is an AMQP map of a dozen mixed entries, a list among them, about
/// 256 bytes encoded: more values to walk than a Data body.
fn value_message() -> Message<Body<Value>> {
    let mut map = fe2o3_amqp::types::primitives::OrderedMap::new();
    for i in 0..10 {
        map.insert(
            Value::from(format!("field-{i}")),
            Value::from(format!("value {i:04}")),
        );
    }
    map.insert(Value::from("count"), Value::Long(42));
    map.insert(
        Value::from("tags"),
        Value::List(vec![Value::from("a"), Value::from("b"), Value::Bool(true)]),
    );
    Message {
        body: Body::Value(AmqpValue(Value::Map(map))),
        ..message()
    }
}

/// The transfer payload of [`message`] (`"data"`) or [`value_message`] (`"value"`).
fn payload(body: &str) -> Vec<u8> {
    let message = match body {
        "data" => message(),
        _ => value_message(),
    };
    serde_amqp::to_vec(&Serializable(message)).expect("encodes")
}

#[divan::bench(args = ["data", "value"])]
fn depth_check(bencher: Bencher, body: &str) {
    let payload = payload(body);
    bencher
        .counter(divan::counter::BytesCount::new(payload.len()))
        .bench(|| depth::check_payload(black_box(&[payload.as_slice()])));
}

/// What the depth check guards, for scale: decoding the same payload.
#[divan::bench(args = ["data", "value"])]
fn decode(bencher: Bencher, body: &str) {
    let payload = payload(body);
    bencher
        .counter(divan::counter::BytesCount::new(payload.len()))
        .bench(|| {
            <Body<Value> as DecodeIntoMessage>::decode_message_from_reader(
                serde_amqp::read::SliceReader::new(black_box(&payload)),
            )
        });
}

#[divan::bench]
fn message_to_request(bencher: Bencher) {
    let message = message();
    let header = HeaderValue::from_static("6f1c1a64-3f0e-4d8e-9a52-8f1d2d3c4b5a");
    bencher.bench(|| PushRequest::from_message(black_box(&message), &header, 0));
}

/// The same for an unsigned enrollment: no `webhook-id` derived.
#[divan::bench]
fn message_to_request_unsigned(bencher: Bencher) {
    let message = message();
    let header = HeaderValue::from_static("6f1c1a64-3f0e-4d8e-9a52-8f1d2d3c4b5a");
    bencher.bench(|| PushRequest::from_message_with(black_box(&message), &header, 0, false));
}

#[divan::bench]
fn verdict_on_answers(bencher: Bencher) {
    let defaults = Config::from_vars(Vec::<(String, String)>::new())
        .expect("the default configuration")
        .delivery_defaults;
    let settings = DeliverySettings::from_json(serde_json::json!({
        "reject_on": [422], "drop_on": ["404", "410"]
    }))
    .expect("valid settings");
    let policy = settings.resolve(&defaults);
    let answers = [Some(200), Some(204), Some(503), Some(422), Some(404), None];
    bencher.bench(|| {
        for answer in &answers {
            black_box(verdict(black_box(*answer), &policy));
        }
    });
}

#[divan::bench]
fn settlement_table(bencher: Bencher) {
    let outcomes = [
        DeliveryOutcome::Delivered { age: None },
        DeliveryOutcome::Failed {
            reason: "target answered 500".into(),
            message_id: None,
        },
        DeliveryOutcome::HandedBack,
    ];
    bencher.bench(|| {
        for outcome in &outcomes {
            black_box(disposition(black_box(outcome), FailureOutcome::Modified));
        }
    });
}

#[divan::bench(args = [256, 16 * 1024])]
fn webhook_signature(bencher: Bencher, body_len: usize) {
    let key = vec![7u8; 32];
    let body = vec![b'x'; body_len];
    bencher.bench(|| signature(&key, "order-000123", 1_700_000_000, black_box(&body)));
}
