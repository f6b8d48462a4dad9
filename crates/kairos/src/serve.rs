//! `kairos serve`: one process, one data directory, the whole personalization loop.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::node::{Node, Role};

pub struct ServeOptions {
    pub role: Role,
    pub demo: bool,
    pub demo_data: Option<PathBuf>,
}

/// Installs the global tracing subscriber (text or JSON lines on stderr).
pub fn init_tracing(format: &str, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second initialization (tests) keeps the first subscriber.
    let _ = result;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested: draining requests");
}

/// Runs the node until SIGINT/SIGTERM, then drains requests, applies everything acknowledged,
/// writes the final snapshot and closes the log.
pub fn run(config: Config, options: ServeOptions) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kairos-api")
        .build()
        .map_err(|e| format!("starting runtime: {e}"))?;
    if options.demo && options.role != Role::All {
        return Err("--demo needs the whole engine: use `kairos serve --demo`".into());
    }
    let node = Node::start_role(&config, options.role)?;
    if options.demo {
        match crate::demo::load(node.log.as_ref(), options.demo_data.as_deref())? {
            Some(summary) => tracing::info!("demo data loaded: {summary}"),
            None => {
                tracing::info!("data directory already holds events; demo data not loaded again")
            }
        }
    }
    let router = if options.demo {
        kairos_api::with_demo_shop(node.router())
    } else {
        node.router()
    };
    let listen = config.listen;
    let demo = options.demo;
    let role = options.role;
    let timeout = Duration::from_secs(config.shutdown_timeout_secs);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("binding {listen}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(%local, data_dir = %config.data_dir.display(), role = ?role, "kairos listening");
        // Machine-readable line for scripts and tests that start on port 0.
        println!("kairos listening on http://{local}");
        if demo {
            tracing::info!("demo shop: http://{local}/demo");
        }
        let server = axum::serve(listener, router).with_graceful_shutdown(shutdown_signal());
        server.await.map_err(|e| format!("server error: {e}"))
    })?;
    runtime.shutdown_timeout(timeout);
    node.shutdown()?;
    tracing::info!("shutdown complete");
    Ok(())
}
