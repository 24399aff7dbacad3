//! A Server-Sent Events client for the tests: reads `GET /api/workspaces/{id}/events` chunk by
//! chunk and parses its events (the fields the app sends: `id`, `event`, `data`).

use std::time::Duration;

use serde_json::Value;

use super::TestApp;

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<i64>,
    pub event: String,
    pub data: Value,
}

pub enum Next {
    Event(SseEvent),
    Ended,
    TimedOut,
}

pub struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

impl SseClient {
    /// Opens the workspace's stream (asserting a 200 `text/event-stream`) and waits for its first
    /// chunk, so the stream is following the workspace when this returns. Without a
    /// `Last-Event-ID` a stream starts after the last numbered event: this first waits until the
    /// relay has numbered every event committed so far, so that the stream starts after them.
    pub async fn open(app: &TestApp, workspace_id: &str, token: &str, last_event_id: Option<i64>) -> SseClient {
        if last_event_id.is_none() {
            until_numbered(app).await;
        }
        Self::open_at(&app.client, &app.address, workspace_id, token, last_event_id).await
    }

    /// `open`, on any server (`base_url` such as `http://127.0.0.1:8080`) with the caller's client.
    pub async fn open_at(
        client: &reqwest::Client,
        base_url: &str,
        workspace_id: &str,
        token: &str,
        last_event_id: Option<i64>,
    ) -> SseClient {
        let response = Self::request_at(client, base_url, workspace_id, token, last_event_id).await;
        assert_eq!(response.status(), 200, "opening the stream");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let mut client = SseClient {
            response,
            buffer: String::new(),
        };
        let first = tokio::time::timeout(Duration::from_secs(5), client.response.chunk())
            .await
            .expect("the stream's first chunk within 5 s")
            .expect("reading the stream")
            .expect("a first chunk");
        client.buffer.push_str(std::str::from_utf8(&first).unwrap());
        assert!(client.buffer.starts_with("retry:"), "first chunk: {:?}", client.buffer);
        client
    }

    /// The raw response of opening a stream (for refusals).
    pub async fn request(
        app: &TestApp,
        workspace_id: &str,
        token: &str,
        last_event_id: Option<i64>,
    ) -> reqwest::Response {
        Self::request_at(&app.client, &app.address, workspace_id, token, last_event_id).await
    }

    async fn request_at(
        client: &reqwest::Client,
        base_url: &str,
        workspace_id: &str,
        token: &str,
        last_event_id: Option<i64>,
    ) -> reqwest::Response {
        let mut request = client
            .get(format!("{base_url}/api/workspaces/{workspace_id}/events"))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        request.send().await.expect("the request is sent")
    }

    /// The next event (comments, `retry:` and heartbeats skipped), the end of the stream, or
    /// nothing within `within`.
    pub async fn next(&mut self, within: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse(&block) {
                    return Next::Event(event);
                }
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return Next::TimedOut,
                Ok(Ok(Some(chunk))) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                Ok(Ok(None)) | Ok(Err(_)) => return Next::Ended,
            }
        }
    }

    /// The next event, which must come within `within`.
    pub async fn expect_event(&mut self, within: Duration) -> SseEvent {
        match self.next(within).await {
            Next::Event(event) => event,
            Next::Ended => panic!("the stream ended, an event was expected"),
            Next::TimedOut => panic!("no event within {within:?}"),
        }
    }

    /// Events until the stream ends; `None` if it is still open after `within`.
    pub async fn until_end(&mut self, within: Duration) -> Option<Vec<SseEvent>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Event(event) => events.push(event),
                Next::Ended => return Some(events),
                Next::TimedOut => return None,
            }
        }
    }
}

/// Until no committed event waits for the relay (5 s at most).
pub async fn until_numbered(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let waiting: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE published_at IS NULL)")
            .fetch_one(&app.db)
            .await
            .expect("reading the events table");
        if !waiting {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "events not numbered within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn parse(block: &str) -> Option<SseEvent> {
    let (mut id, mut event, mut data) = (None, None, String::new());
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("id: ") {
            id = Some(value.parse().expect("numeric ids"));
        } else if let Some(value) = line.strip_prefix("event: ") {
            event = Some(value.to_owned());
        } else if let Some(value) = line.strip_prefix("data: ") {
            data.push_str(value);
        }
    }
    Some(SseEvent {
        id,
        event: event?,
        data: serde_json::from_str(&data).expect("event data is JSON"),
    })
}
