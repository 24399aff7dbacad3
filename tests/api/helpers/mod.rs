//! The test harness: `TestApp::spawn().await` runs the real app on a random port against its own
//! fresh database (a copy of the migrated template) on the harness-owned Postgres.
//! `TestApp::builder().settings(|s| ...).postgres(&server).spawn().await` customises it.
//! Set `TEST_LOG=1` to see the app's logs.

pub mod cluster;
pub mod instance;
pub mod partition;
pub mod redis;
pub mod servers;
pub mod sse;

use std::sync::Once;
use std::time::Duration;

use nestling::config::{AppEnv, Settings};
use nestling::container::AppModule;
use nestling::startup::Application;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use shaku::ModuleBuilder;
use sqlx::{Connection, PgPool};
use uuid::Uuid;

pub use cluster::{private_cluster, shared_cluster, TestCluster};
pub use redis::{private_redis, shared_redis, TestRedis};
pub use servers::{private_postgres, shared_postgres, TestPostgres};

pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    /// A pool on this test's database, for assertions the API cannot make.
    pub db: PgPool,
    pub db_name: String,
    /// The settings this instance runs with (Redis key prefix included).
    pub settings: Settings,
    /// The running instance's container: its components, as its requests see them.
    pub module: std::sync::Arc<AppModule>,
    admin_url: String,
    server: actix_web::dev::ServerHandle,
    /// Siblings share the first instance's database; only the first drops it.
    owns_database: bool,
}

type SettingsTweak = Box<dyn FnOnce(&mut Settings)>;

/// Where a test's Redis lives, for suites that run against one server and a cluster alike.
#[derive(Clone, Copy)]
pub enum Backend {
    Redis(&'static TestRedis),
    Cluster(&'static TestCluster),
}

impl Backend {
    pub async fn redis() -> Backend {
        Backend::Redis(tokio::task::spawn_blocking(shared_redis).await.unwrap())
    }

    pub async fn cluster() -> Backend {
        Backend::Cluster(tokio::task::spawn_blocking(shared_cluster).await.unwrap())
    }

    /// A second instance of `first`'s deployment; on a cluster it is given the seed nodes in
    /// another order, so the two subscribe on different nodes.
    pub async fn sibling(self, first: &TestApp) -> TestApp {
        let builder = TestApp::builder().sibling_of(first);
        match self {
            Backend::Redis(_) => builder.spawn().await,
            Backend::Cluster(cluster) => {
                let seeds = cluster.nodes_from(3);
                builder.settings(move |s| s.redis.cluster_nodes = seeds).spawn().await
            }
        }
    }
}
type ModuleTweak = Box<dyn FnOnce(ModuleBuilder<AppModule>) -> ModuleBuilder<AppModule>>;

pub struct TestAppBuilder<'a> {
    tweaks: Vec<SettingsTweak>,
    postgres: Option<&'a TestPostgres>,
    redis: Option<&'a TestRedis>,
    cluster: Option<&'a TestCluster>,
    sibling_of: Option<&'a TestApp>,
    module: Option<ModuleTweak>,
}

fn init_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,sqlx=warn"))
                .is_test(true)
                .try_init();
        }
    });
}

/// Settings for a test app: defaults, test environment, a random port, one worker.
pub fn test_settings() -> Settings {
    let mut settings = Settings::from_lookup(|_| None).expect("defaults are valid");
    settings.app.env = AppEnv::Test;
    settings.app.port = 0;
    settings.app.workers = 1;
    settings.app.shutdown_timeout = Duration::from_secs(1);
    settings.database.url_is_default = false;
    settings.database.max_connections = 5;
    // The suite's own traffic (a thousand concurrent reads, steady load) is not what the
    // rate-limit tests measure: they set their own policies.
    let plenty = vec![nestling::config::Quota {
        limit: 1_000_000,
        period: Duration::from_secs(60),
    }];
    settings.rate_limit.api = plenty.clone();
    settings.rate_limit.auth_ip = plenty.clone();
    settings.rate_limit.auth_email = plenty;
    settings
}

impl<'a> TestAppBuilder<'a> {
    pub fn settings(mut self, tweak: impl FnOnce(&mut Settings) + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// Use this (private) server instead of the shared one.
    pub fn postgres(mut self, server: &'a TestPostgres) -> Self {
        self.postgres = Some(server);
        self
    }

    /// Turn Redis on, against this server (`shared_redis()` for the shared one), with a key
    /// prefix of this test's own.
    pub fn redis(mut self, server: &'a TestRedis) -> Self {
        self.redis = Some(server);
        self
    }

    pub fn backend(self, backend: Backend) -> Self {
        match backend {
            Backend::Redis(server) => self.redis(server),
            Backend::Cluster(cluster) => self.cluster(cluster),
        }
    }

    /// Turn Redis on, against this cluster (all its nodes as seeds), with a key prefix of this
    /// test's own.
    pub fn cluster(mut self, cluster: &'a TestCluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Turn Redis on at this URL (a server the test does not own, a TLS endpoint, an ACL user),
    /// keeping the test's key prefix.
    pub fn redis_url(self, url: impl Into<String>) -> Self {
        let url = url.into();
        self.settings(move |s| {
            s.redis.enabled = true;
            s.redis.url = url;
        })
    }

    /// Swap components before the container is built (`with_component_override`).
    pub fn module(
        mut self,
        tweak: impl FnOnce(ModuleBuilder<AppModule>) -> ModuleBuilder<AppModule> + 'static,
    ) -> Self {
        self.module = Some(Box::new(tweak));
        self
    }

    /// A second instance of `app`: same database, same Redis and key prefix (a deployment of two).
    pub fn sibling_of(mut self, app: &'a TestApp) -> Self {
        self.sibling_of = Some(app);
        self
    }

    pub async fn spawn(self) -> TestApp {
        init_logging();
        if let Some(first) = self.sibling_of {
            let mut settings = first.settings.clone();
            for tweak in self.tweaks {
                tweak(&mut settings);
            }
            let wait_for_redis = settings.redis.enabled;
            return start(
                settings,
                self.module,
                first.db_name.clone(),
                first.admin_url.clone(),
                false,
                wait_for_redis,
            )
            .await;
        }
        let postgres = match self.postgres {
            Some(server) => server,
            None => tokio::task::spawn_blocking(shared_postgres)
                .await
                .expect("shared postgres"),
        };
        let (db_name, admin_url) = create_database(postgres).await;

        let mut settings = test_settings();
        settings.database.url = postgres.url(&db_name);
        if let Some(redis) = self.redis {
            settings.redis.enabled = true;
            settings.redis.url = redis.url();
            settings.redis.fleet_sync = true;
            settings.redis.key_prefix = format!("test-{}:", Uuid::new_v4().simple());
        }
        if let Some(cluster) = self.cluster {
            settings.redis.enabled = true;
            settings.redis.cluster_nodes = cluster.nodes_from(0);
            settings.redis.fleet_sync = true;
            settings.redis.key_prefix = format!("test-{}:", Uuid::new_v4().simple());
        }
        let wait_for_redis = self.redis.is_some() || self.cluster.is_some();
        for tweak in self.tweaks {
            tweak(&mut settings);
        }
        start(settings, self.module, db_name, admin_url, true, wait_for_redis).await
    }
}

/// A fresh database copied from the migrated template: (name, the admin URL of its server).
pub async fn create_database(postgres: &TestPostgres) -> (String, String) {
    let db_name = format!("test_{}", Uuid::new_v4().simple());
    let admin_url = postgres.url("postgres");
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.expect("connect as admin");
    sqlx::query(&format!("CREATE DATABASE {db_name} TEMPLATE {}", servers::TEMPLATE_DB))
        .execute(&mut admin)
        .await
        .expect("create test database");
    admin.close().await.ok();
    (db_name, admin_url)
}

/// Drops a test database (on a thread of its own: the caller's runtime may be blocked in a drop).
pub fn drop_database(admin_url: String, db_name: String) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let drop_db = async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .ok()
            };
            // A frozen or killed private server cannot answer: do not hang the test on it.
            let _ = tokio::time::timeout(Duration::from_secs(5), drop_db).await;
        });
    })
    .join();
}

/// Starts the app; with `wait_for_redis`, returns once its invalidation subscriber is connected.
async fn start(
    settings: Settings,
    module: Option<ModuleTweak>,
    db_name: String,
    admin_url: String,
    owns_database: bool,
    wait_for_redis: bool,
) -> TestApp {
    let db = PgPool::connect(&settings.database.url).await.expect("test pool");
    let customize = module.unwrap_or_else(|| Box::new(|module| module));
    let app = Application::build_with(settings.clone(), customize)
        .await
        .expect("app builds");
    let port = app.port();
    let server = app.server_handle();
    let module = app.module();
    tokio::spawn(app.run_until_stopped());
    let app = TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
        db,
        db_name,
        settings,
        module,
        admin_url,
        server,
        owns_database,
    };
    if wait_for_redis {
        app.wait_for_subscription().await;
    }
    app
}

impl Drop for TestApp {
    /// Stops the app and drops the test's database (on a thread of its own: the test's runtime,
    /// which runs the server, is blocked here, so nothing below may wait on it).
    fn drop(&mut self) {
        // Sends the stop command; awaiting it would deadlock on this blocked runtime.
        drop(self.server.stop(false));
        if !self.owns_database {
            return;
        }
        drop_database(self.admin_url.clone(), self.db_name.clone());
    }
}

/// One series' value in a Prometheus exposition, by its name and labels as exported.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A response with its body parsed as JSON (`Value::Null` when empty or not JSON).
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl TestResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the error envelope: status, stable code, and every key present.
    pub fn assert_error(&self, status: u16, code: &str) -> &Self {
        assert_eq!(self.status.as_u16(), status, "status for {}: {}", code, self.text);
        assert_eq!(self.body["statusCode"], status, "envelope statusCode: {}", self.text);
        assert_eq!(self.body["code"], code, "envelope code: {}", self.text);
        assert!(self.body["error"].is_string(), "envelope error: {}", self.text);
        assert!(self.body["message"].is_string(), "envelope message: {}", self.text);
        assert!(self.body.get("details").is_some(), "envelope details: {}", self.text);
        self
    }

    pub fn assert_status(&self, status: u16) -> &Self {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        self
    }
}

impl TestApp {
    /// Waits until the invalidation subscriber is connected (it flushes L1 when it connects, so a
    /// test that reads before that could see its L1 entries vanish).
    pub async fn wait_for_subscription(&self) {
        self.wait_for_subscriber(true).await
    }

    /// Waits until the invalidation subscriber has noticed that it lost Redis.
    pub async fn wait_for_lost_subscription(&self) {
        self.wait_for_subscriber(false).await
    }

    async fn wait_for_subscriber(&self, connected: bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let health = self.request(Method::GET, "/health", None, None).await;
            if (health.body["details"]["redis"]["subscriber"] == "connected") == connected {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "subscriber still {}connected: {}",
                if connected { "not " } else { "" },
                health.text
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn spawn() -> TestApp {
        Self::builder().spawn().await
    }

    pub fn builder<'a>() -> TestAppBuilder<'a> {
        TestAppBuilder {
            tweaks: Vec::new(),
            postgres: None,
            redis: None,
            cluster: None,
            sibling_of: None,
            module: None,
        }
    }

    /// A component as the app builds it (no overrides), on this test's database: the real part
    /// a test override wraps.
    pub fn real_component<I: shaku::Interface + ?Sized>(&self) -> std::sync::Arc<I>
    where
        AppModule: shaku::HasComponent<I>,
    {
        let module = nestling::container::builder(&self.settings, self.db.clone()).build();
        shaku::HasComponent::resolve(&module)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// Any request: `body` is sent as JSON when given.
    pub async fn request(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> TestResponse {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        into_test_response(request.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str, token: &str) -> TestResponse {
        self.request(Method::GET, path, Some(token), None).await
    }

    /// Reads `path` until this instance serves it from L1 (2 s at most). Invalidations reach
    /// other instances by pub/sub after the writer's request has returned: one that arrives late
    /// (under load) drops the entry the reader has just filled, and its next read goes to L2
    /// again. That is correct, so wait it out.
    pub async fn read_until_l1_hit(&self, path: &str, token: &str, what: &str) {
        let l1_hit = |read: &TestResponse| read.header("x-cache") == Some("HIT-L1");
        self.read_until(path, token, &format!("{what}: L1 keeps {path}"), l1_hit)
            .await;
    }

    /// Reads `path` until `done` holds for the answer (2 s at most) and returns that answer.
    /// What another instance writes reaches this one by pub/sub, after the writer's request has
    /// returned; `what` says what was awaited, should it never come.
    pub async fn read_until(
        &self,
        path: &str,
        token: &str,
        what: &str,
        done: impl Fn(&TestResponse) -> bool,
    ) -> TestResponse {
        let by = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let read = self.get(path, token).await;
            if done(&read) {
                return read;
            }
            assert!(
                std::time::Instant::now() < by,
                "{what}: still {} {} after 2 s",
                read.status,
                read.text
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reads `/api/users/me` with `token` until it is refused (`401 invalid_token`) and returns
    /// how long that took; `None` if it was still served after `give_up`. Polling: nothing
    /// signals the moment an instance stops honouring a token.
    pub async fn refused_after(&self, token: &str, give_up: Duration) -> Option<Duration> {
        let since = std::time::Instant::now();
        loop {
            let me = self.get("/api/users/me", token).await;
            if me.status == 401 {
                me.assert_error(401, "invalid_token");
                return Some(since.elapsed());
            }
            me.assert_status(200);
            if since.elapsed() > give_up {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// This instance's `/metrics`, as Prometheus scrapes it.
    pub async fn scrape_metrics(&self) -> String {
        let response = self.request(Method::GET, "/metrics", None, None).await;
        response.assert_status(200);
        response.text
    }

    /// One series of this instance's `/metrics` (`name{labels}` as exported), if exported.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        sample(&self.scrape_metrics().await, series)
    }

    /// A GET with `Cache-Control: no-cache`: what Postgres holds now, past every cache tier.
    pub async fn get_fresh(&self, path: &str, token: &str) -> TestResponse {
        let request = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .header("cache-control", "no-cache");
        into_test_response(request.send().await.expect("request sent")).await
    }

    /// A GET revalidating `etag` (`If-None-Match`).
    pub async fn conditional_get(&self, path: &str, token: &str, etag: &str) -> TestResponse {
        let request = self.client.get(self.url(path)).bearer_auth(token);
        into_test_response(request.header("If-None-Match", etag).send().await.expect("request")).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> TestResponse {
        self.request(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> TestResponse {
        self.request(Method::PATCH, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> TestResponse {
        self.request(Method::DELETE, path, Some(token), None).await
    }

    /// Registers a fresh user and logs in.
    pub async fn register_user(&self) -> TestUser {
        let email = format!("user-{}@example.com", Uuid::new_v4().simple());
        let password = "correct horse battery".to_owned();
        let registered = self
            .request(
                Method::POST,
                "/api/auth/register",
                None,
                Some(json!({ "email": email, "password": password, "name": "Test User" })),
            )
            .await;
        registered.assert_status(201);
        let id = registered.body["id"].as_str().unwrap().parse().unwrap();
        let token = self.login(&email, &password).await;
        TestUser {
            id,
            email,
            password,
            token,
        }
    }

    pub async fn login(&self, email: &str, password: &str) -> String {
        let response = self
            .request(
                Method::POST,
                "/api/auth/login",
                None,
                Some(json!({ "email": email, "password": password })),
            )
            .await;
        response.assert_status(200);
        response.body["token"].as_str().unwrap().to_owned()
    }

    pub async fn create_workspace(&self, owner: &TestUser) -> Value {
        let response = self
            .post("/api/workspaces", &owner.token, json!({ "name": "Workspace" }))
            .await;
        response.assert_status(201);
        response.body
    }

    pub async fn create_project(&self, user: &TestUser, workspace_id: &str) -> Value {
        let path = format!("/api/workspaces/{workspace_id}/projects");
        let response = self.post(&path, &user.token, json!({ "name": "Project" })).await;
        response.assert_status(201);
        response.body
    }

    pub async fn create_task(&self, user: &TestUser, project_id: &str, body: Value) -> Value {
        let response = self
            .post(&format!("/api/projects/{project_id}/tasks"), &user.token, body)
            .await;
        response.assert_status(201);
        response.body
    }

    /// A user with a workspace and a project in it: (user, workspace, project).
    pub async fn user_with_project(&self) -> (TestUser, Value, Value) {
        let user = self.register_user().await;
        let workspace = self.create_workspace(&user).await;
        let project = self.create_project(&user, workspace["id"].as_str().unwrap()).await;
        (user, workspace, project)
    }

    /// `owner` adds `member` to the workspace (by email, as a plain member).
    pub async fn add_member(&self, owner: &TestUser, workspace_id: &str, member: &TestUser) -> Value {
        let path = format!("/api/workspaces/{workspace_id}/members");
        let response = self.post(&path, &owner.token, json!({ "email": member.email })).await;
        response.assert_status(201);
        response.body
    }
}

pub async fn into_test_response(response: reqwest::Response) -> TestResponse {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    TestResponse {
        status,
        headers,
        body,
        text,
    }
}

#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: Uuid,
    pub email: String,
    pub password: String,
    pub token: String,
}

/// A user with a workspace, a project and a task assigned to them: real targets for requests.
pub struct World {
    pub user: TestUser,
    pub workspace: String,
    pub project: String,
    pub task: String,
}

impl World {
    pub async fn create(app: &TestApp) -> World {
        let (user, workspace, project) = app.user_with_project().await;
        let project = project["id"].as_str().unwrap().to_owned();
        let task = app
            .create_task(&user, &project, json!({ "title": "original", "assigneeId": user.id }))
            .await;
        World {
            workspace: workspace["id"].as_str().unwrap().to_owned(),
            task: task["id"].as_str().unwrap().to_owned(),
            project,
            user,
        }
    }

    /// `template` with `{ws}` / `{workspace}`, `{project}`, `{task}` and `{today}` (UTC) filled in.
    pub fn fill(&self, template: &str) -> String {
        template
            .replace("{ws}", &self.workspace)
            .replace("{workspace}", &self.workspace)
            .replace("{project}", &self.project)
            .replace("{task}", &self.task)
            .replace("{today}", &chrono::Utc::now().date_naive().to_string())
    }
}

impl TestApp {
    /// Row count and an md5 over the rows of every domain table, to assert a request changed
    /// nothing (`auth_tokens` is left out: logging in writes to it).
    pub async fn fingerprint(&self) -> Vec<(&'static str, i64, Option<String>)> {
        let mut tables = Vec::new();
        for table in ["users", "workspaces", "workspace_members", "projects", "tasks"] {
            let sql = format!("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t");
            let (count, digest): (i64, Option<String>) = sqlx::query_as(&sql)
                .fetch_one(&self.db)
                .await
                .expect("fingerprint query");
            tables.push((table, count, digest));
        }
        tables
    }
}
