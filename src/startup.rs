//! Start-up: database → container → HttpServer. `Application::build` binds (port 0 works, for
//! tests), `port()` tells where, `run_until_stopped()` serves until SIGTERM/Ctrl-C (graceful).

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::middleware::{Condition, Logger};
use actix_web::{web, App, HttpResponse, HttpServer};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::{AppEnv, Settings};
use crate::container::{self, AppModule};
use crate::error;
use crate::infra::cache::CacheService;
use crate::infra::cors::Cors;
use crate::infra::database::{self, Database, DatabaseSetupError};
use crate::infra::edge::Edge;
use crate::infra::events::EventBus;
use crate::infra::jobs::JobQueue;
use crate::infra::telemetry::MetricsRegistry;
use crate::modules;
use crate::modules::health::service::HealthService;
use crate::openapi::ApiDoc;
use shaku::{HasComponent, ModuleBuilder};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Database(#[from] DatabaseSetupError),
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("cannot listen for SIGTERM and Ctrl-C: {0}")]
    Signals(std::io::Error),
}

pub struct Application {
    port: u16,
    server: Server,
    module: Arc<AppModule>,
    shutdown_timeout: std::time::Duration,
    shutdown_delay: std::time::Duration,
    signals: StopSignals,
}

impl Application {
    /// Prepares the database (dev service, create, migrate), builds the container and binds.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        Self::build_with(settings, |module| module).await
    }

    /// `build`, with a hook on the container before it is built: tests swap components with
    /// `with_component_override` (the NestJS `overrideProvider`).
    pub async fn build_with(
        mut settings: Settings,
        customize: impl FnOnce(ModuleBuilder<AppModule>) -> ModuleBuilder<AppModule>,
    ) -> Result<Self, StartupError> {
        let migrate = settings.database.migrate_on_start;
        let pool = database::prepare(&mut settings, migrate).await?;
        let module = Arc::new(customize(container::builder(&settings, pool)).build());
        Self::serve(&settings, module)
    }

    /// Binds and starts serving an already built container (tests build theirs with overrides).
    pub fn serve(settings: &Settings, module: Arc<AppModule>) -> Result<Self, StartupError> {
        let container = module.clone();
        start_background_work(&module, settings);
        let metrics: Arc<dyn MetricsRegistry> = module.resolve();
        let telemetry = metrics.telemetry();
        let address = format!("{}:{}", settings.app.host, settings.app.port);
        let bind_error = |source| StartupError::Bind {
            address: address.clone(),
            source,
        };
        // Before the socket listens: from then on, connections are accepted (by the kernel).
        let signals = StopSignals::listen().map_err(StartupError::Signals)?;
        let listener = TcpListener::bind(&address).map_err(bind_error)?;
        let port = listener.local_addr().map_err(bind_error)?.port();
        let openapi = ApiDoc::openapi();
        let request_log = log::log_enabled!(target: "actix_web::middleware::logger", log::Level::Info);
        let cors = settings.cors.clone();
        let hsts = settings.app.env == AppEnv::Production;
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(module.clone())
                // Counts the cached reads' compressions (`cached_response`).
                .app_data(telemetry.clone())
                .app_data(error::json_config())
                .app_data(error::path_config())
                .app_data(error::query_config())
                // Inside `Edge` (its answers get the request id and security headers), outside
                // every scope's rate limit: a preflight costs no token (wraps run last-added first).
                .wrap(Cors::new(&cors))
                .wrap(Edge::new(telemetry.clone(), hsts))
                // The logger renders its fields for every request; mount it only when it will print.
                .wrap(Condition::new(
                    request_log,
                    Logger::new(r#"%a "%r" %s %b %Dms rid=%{x-request-id}o"#),
                ))
                .configure(modules::configure)
                .service(SwaggerUi::new("/docs/{_:.*}").url("/api-docs/openapi.json", openapi.clone()))
                .route("/docs", web::get().to(|| async { redirect("/docs/") }))
                .default_service(web::to(error::route_not_found))
        })
        .shutdown_timeout(settings.app.shutdown_timeout.as_secs())
        // `run_until_stopped` handles SIGTERM and Ctrl-C: it ends the event streams first.
        .disable_signals();
        if settings.app.workers > 0 {
            server = server.workers(settings.app.workers);
        }
        let server = server.listen(listener).map_err(bind_error)?.run();
        log::info!("listening on http://{}:{port} (API docs at /docs)", settings.app.host);
        Ok(Self {
            port,
            server,
            module: container,
            shutdown_timeout: settings.app.shutdown_timeout,
            shutdown_delay: settings.app.shutdown_delay,
            signals,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running container (tests subscribe to events through it).
    pub fn module(&self) -> Arc<AppModule> {
        self.module.clone()
    }

    /// Stops the server from elsewhere (tests stop theirs when they end).
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM or Ctrl-C, then stops gracefully. SIGTERM (what an orchestrator or
    /// `docker stop` sends): readiness answers 503 at once, and the instance goes on serving for
    /// `APP_SHUTDOWN_DELAY`, so that load balancers polling readiness stop routing here first
    /// (Ctrl-C, a person at a terminal, skips the wait). Then event streams are ended (their
    /// clients reconnect elsewhere with `Last-Event-ID`, rather than hold the shutdown for
    /// `APP_SHUTDOWN_TIMEOUT`), requests in flight finish, the workers stop taking jobs and
    /// finish theirs within the timeout, and the Postgres pool closes. A second signal stops at
    /// once.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let health: Arc<dyn HealthService> = self.module.resolve();
        let events: Arc<dyn EventBus> = self.module.resolve();
        let jobs: Arc<dyn JobQueue> = self.module.resolve();
        let database: Arc<dyn Database> = self.module.resolve();
        let (within, delay) = (self.shutdown_timeout, self.shutdown_delay);
        let mut signals = self.signals;
        let signalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = tokio::spawn({
            let signalled = signalled.clone();
            async move {
                let signal = signals.next().await;
                signalled.store(true, std::sync::atomic::Ordering::Relaxed);
                health.begin_stopping();
                if signal == StopSignal::Terminate && !delay.is_zero() {
                    log::info!("stopping: not ready from now on; serving {delay:?} more so that load balancers notice (again to stop at once)");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = signals.next() => return handle.stop(false).await,
                    }
                }
                log::info!(
                    "stopping: ending event streams, finishing requests and jobs in flight (again to stop at once)"
                );
                events.end_streams();
                // Jobs stop taking work, finish within the timeout, and hand the rest back.
                let jobs_stopped = tokio::spawn(async move { jobs.stop(within).await });
                let graceful = async {
                    handle.stop(true).await;
                    let _ = jobs_stopped.await;
                };
                tokio::select! {
                    _ = graceful => {}
                    _ = signals.next() => handle.stop(false).await,
                }
            }
        });
        let served = self.server.await;
        if signalled.load(std::sync::atomic::Ordering::Relaxed) {
            // The jobs' turn to finish, then the pool: its connections end cleanly.
            let _ = stopping.await;
            let _ = tokio::time::timeout(within, database.pool().close()).await;
            log::info!("stopped");
        } else {
            // Stopped through its handle (tests): nothing was asked of the rest.
            stopping.abort();
        }
        served
    }
}

/// `nestling worker`: this configuration's job workers and scheduler, with the event relay and
/// the cache's fleet sync (the jobs write, and what they change must reach the fleet), and no
/// HTTP. SIGTERM or Ctrl-C: no new jobs, running ones get `APP_SHUTDOWN_TIMEOUT`, the rest are
/// handed back.
pub async fn run_worker(mut settings: Settings) -> Result<(), StartupError> {
    let migrate = settings.database.migrate_on_start;
    let pool = database::prepare(&mut settings, migrate).await?;
    let module = Arc::new(container::builder(&settings, pool).build());
    let mut signals = StopSignals::listen().map_err(StartupError::Signals)?;
    start_background_work(&module, &settings);
    let jobs: Arc<dyn JobQueue> = module.resolve();
    if settings.jobs.workers == 0 {
        log::warn!("worker: JOBS_WORKERS=0, so this process runs no job (only the scheduler)");
    }
    log::info!("worker: running up to {} jobs at once, no HTTP", settings.jobs.workers);
    signals.next().await;
    log::info!(
        "worker: stopping: no new jobs, running ones get {:?}",
        settings.app.shutdown_timeout
    );
    jobs.stop(settings.app.shutdown_timeout).await;
    Ok(())
}

/// What runs beside the requests, in a web instance and a worker alike: the cache's fleet sync,
/// the event relay and feeds, the app's job kinds and schedules, the workers.
fn start_background_work(module: &AppModule, settings: &Settings) {
    let cache: Arc<dyn CacheService> = module.resolve();
    cache.start();
    let events: Arc<dyn EventBus> = module.resolve();
    events.start();
    let jobs: Arc<dyn JobQueue> = module.resolve();
    modules::register_jobs(module, &settings.jobs);
    jobs.start();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopSignal {
    /// SIGTERM: an orchestrator, `docker stop`, a rolling restart.
    Terminate,
    /// Ctrl-C (SIGINT).
    Interrupt,
}

/// SIGTERM and Ctrl-C, listened for from the moment this is made: made before the server accepts
/// its first connection, so that a signal arriving while the instance starts stops it gracefully
/// rather than killing it (the default action), as it did when the listeners were made later.
struct StopSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next stop signal.
    async fn next(&mut self) -> StopSignal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => StopSignal::Interrupt,
                _ = self.terminate.recv() => StopSignal::Terminate,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            StopSignal::Interrupt
        }
    }
}

fn redirect(to: &'static str) -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header(("Location", to))
        .finish()
}
