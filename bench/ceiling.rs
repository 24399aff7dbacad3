//! The ceiling: a bare actix-web server answering every request with the same bytes as the
//! benchmarked endpoint (read from the file given as the first argument). Built and run by
//! `bench/run.sh`; nestling's L1-hit path is measured against it in the same run.

use actix_web::{web, App, HttpResponse, HttpServer};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let body = std::fs::read(args.next().expect("usage: ceiling <body file> <port>"))?;
    let port: u16 = args
        .next()
        .and_then(|p| p.parse().ok())
        .expect("usage: ceiling <body file> <port>");
    let body = web::Bytes::from(body);
    HttpServer::new(move || {
        let body = body.clone();
        App::new().default_service(web::to(move || {
            let body = body.clone();
            async move { HttpResponse::Ok().content_type("application/json").body(body) }
        }))
    })
    .bind(("127.0.0.1", port))?
    .run()
    .await
}
