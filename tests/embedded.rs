//! The embeddable listener: `examples/embedded_server.rs` (axum behind `GatewayListener`)
//! serves HTTP through the gateway and answers with the client's real address; and the library
//! API directly, including a refused bind.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use sallyport::agent::GatewayListener;
use support::nginx::curl;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// target/<profile>/examples/embedded_server, next to the sallyport binary.
fn example_binary() -> PathBuf {
    let path = std::path::Path::new(BIN)
        .parent()
        .unwrap()
        .join("examples")
        .join("embedded_server");
    if !path.exists() {
        // `cargo test` builds examples; a runner that does not gets them built here.
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--example", "embedded_server"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    path
}

#[test]
fn the_embedded_example_answers_with_the_real_client_address() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let gateway = start_gateway_with(
        &dir,
        "gateway",
        &format!("listen = \"127.0.0.1:0\"\n{}", gateway_tls(&certs)),
        "",
    );
    let public = free_port();
    let example = example_binary();
    let server = Proc::spawn_program(
        "example",
        example.to_str().unwrap(),
        &[
            "--gateway",
            &gateway.control.to_string(),
            "--public",
            &format!("127.0.0.1:{public}"),
            "--tls-dir",
            certs.to_str().unwrap(),
        ],
    );
    server.wait_for_log(
        &format!("serving on the gateway at http://127.0.0.1:{public}/"),
        Duration::from_secs(20),
    );
    let (ok, body, err) = curl(&[
        "--interface",
        "127.0.0.9",
        &format!("http://127.0.0.1:{public}/"),
    ]);
    assert!(ok, "curl failed: {err}");
    assert!(
        body.starts_with("Hello 127.0.0.9:"),
        "the server must see the real client: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_api_accepts_clients_and_reports_a_refused_bind() {
    let dir = Workdir::new();
    let gateway = start_gateway(&dir, "");
    let control = gateway.control.to_string();
    let public = free_port();
    let listener = GatewayListener::builder(&control, "embedded", &format!("127.0.0.1:{public}"))
        .unwrap()
        .bind()
        .await
        .unwrap();
    assert_eq!(listener.local_addr().unwrap(), local(public));

    let serve = tokio::spawn(async move {
        let (mut stream, client) = listener.accept().await.unwrap();
        let mut request = [0u8; 5];
        stream.read_exact(&mut request).await.unwrap();
        stream
            .write_all(format!("{} from {client}", String::from_utf8_lossy(&request)).as_bytes())
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        listener
    });
    let mut client = tokio::net::TcpStream::connect(local(public)).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    assert_eq!(
        answer,
        format!("hello from {}", client.local_addr().unwrap())
    );

    // The same public port again: the gateway says it is in use, and bind() says so.
    let err = match GatewayListener::builder(&control, "other-site", &format!("127.0.0.1:{public}"))
        .unwrap()
        .bind()
        .await
    {
        Ok(_) => panic!("a second bind of the same port must fail"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("address in use"), "{err}");

    // Dropping the listener closes the port.
    drop(serve.await.unwrap());
    assert!(wait_until(Duration::from_secs(5), || refuses(local(
        public
    ))));
}
