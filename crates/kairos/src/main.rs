//! `kairos`: the real-time personalization engine in one binary.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use kairos::config::{self, DEFAULT_CONFIG};
use kairos::eval::{self, EvalOptions, ReplayInput};
use kairos::node::Role;
use kairos::serve::{self, ServeOptions};

#[derive(Parser)]
#[command(
    name = "kairos",
    version,
    about = "Kairos: real-time personalization engine (tracker ingest, durable event log, stream processor, state and recommendation API in one binary)"
)]
struct Cli {
    /// TOML configuration file (overrides the built-in defaults; see `kairos config --default`).
    #[arg(long, global = true, env = "KAIROS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole engine: ingest API, event log, processor, state and recommendation API.
    Serve(ServeArgs),
    /// Run only the ingest API (tracker endpoints, catalogue writes), appending to a Kafka
    /// topic (--log kafka://HOST:PORT) that a `kairos serve` on the same topic processes.
    /// Stateless: run as many as the traffic needs.
    Ingest(ServeArgs),
    /// Run one processor replica: a member of the Kafka consumer group `kafka.group` that
    /// applies the events of the partitions the group gives it, with the profiles in Redis
    /// (--log kafka://HOST:PORT --state redis://HOST:PORT). Serves health and metrics only. Run
    /// as many as the topic has partitions; a crashed one's partitions move to the others.
    Process(ServeArgs),
    /// Run one stateless API replica: recommendations, profiles and catalogue reads, ranked
    /// over the model the processor replicas publish on `kafka.model_topic`, with the profiles
    /// read from Redis and answers cached until a profile they use changes (--log
    /// kafka://HOST:PORT --state redis://HOST:PORT). Run as many as the read traffic needs.
    Api(ServeArgs),
    /// Print the effective configuration (defaults, file, KAIROS_* variables) as TOML.
    Config {
        /// Print the commented built-in defaults instead.
        #[arg(long)]
        default: bool,
    },
    /// Measure recommendation quality offline through the same state and recommender code
    /// `serve` runs, with the effective configuration.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Benchmark a `kairos serve` child on a fresh data directory over HTTP: ingest, serve,
    /// freshness, memory and recovery, each beside its ceiling measured in the same run.
    Bench(BenchArgs),
    /// Drive GET requests at a running Kairos with the bench's load generator, and print the
    /// throughput and latency percentiles as one JSON line: for measuring a deployment, such as
    /// `kairos api` replicas (scripts/bench-api.py).
    Load(LoadArgs),
}

#[derive(Args)]
struct LoadArgs {
    /// The server, HOST:PORT.
    #[arg(long)]
    addr: std::net::SocketAddr,
    /// A file of request paths, one per line (`/v1/recommendations?...`), sent round robin.
    #[arg(long)]
    paths: PathBuf,
    /// Requests per second offered (open loop, latency at that rate); without it, each
    /// connection sends its next request as soon as the last is answered (maximum throughput).
    #[arg(long)]
    rate: Option<f64>,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
}

#[derive(Args)]
struct BenchArgs {
    /// Small scale (20k users, 5k items), under a minute: a smoke test.
    #[arg(long)]
    quick: bool,
    /// Also print the report as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Scenarios to run (comma-separated or repeated): ingest, serve, freshness, memory,
    /// recovery [default: all].
    #[arg(long, value_delimiter = ',', value_parser = parse_scenario)]
    scenario: Vec<kairos::bench::Scenario>,
    /// Directory under which the scratch data directory is created; its disk is the one
    /// measured [default: the system temp directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seed of the synthetic traffic.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep the scratch data directory and the server's log.
    #[arg(long)]
    keep: bool,
}

fn parse_scenario(s: &str) -> Result<kairos::bench::Scenario, String> {
    kairos::bench::Scenario::parse(s).ok_or_else(|| {
        format!("unknown scenario {s:?}; use ingest, serve, freshness, memory or recovery")
    })
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Sessions split (SR-GNN protocol): learn the training sessions in file order, then score
    /// the label of every test prefix fed as a fresh anonymous session (no learning).
    Sessions {
        /// train_sessions.csv (`session_idx,items`).
        #[arg(long)]
        train: PathBuf,
        /// test_prefixes.csv (`idx,prefix,label`).
        #[arg(long)]
        test: PathBuf,
        #[command(flatten)]
        common: EvalCommon,
    },
    /// Prequential replay of an event stream: before each event of a user with history, score
    /// the event's item in the user's `for_you` list, then learn the event.
    Replay {
        /// events.csv (`timestamp_ms,user_id,session_id,event,item_id`).
        #[arg(long)]
        events: PathBuf,
        /// items.csv (`item_id,title,categories`), loaded as the catalogue first.
        #[arg(long)]
        items: Option<PathBuf>,
        /// Events to score; all of --events then only warm the engine.
        #[arg(long, conflicts_with = "score_from")]
        test_events: Option<PathBuf>,
        /// Score only events at or after this time (epoch ms); earlier ones only warm.
        #[arg(long)]
        score_from: Option<i64>,
        #[command(flatten)]
        common: EvalCommon,
    },
}

#[derive(Args)]
struct EvalCommon {
    /// Length of the recommended lists (the k of HR@k, MRR@k, NDCG@k).
    #[arg(long, default_value_t = 20)]
    k: usize,
    /// Also print the report as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Write every scored case to this CSV file
    /// (`case,session_id,user_id,position,label,rank,top_k`).
    #[arg(long)]
    dump: Option<PathBuf>,
}

impl EvalCommon {
    fn options(&self) -> EvalOptions {
        EvalOptions {
            k: self.k,
            dump: self.dump.clone(),
            progress: std::io::stderr().is_terminal(),
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Address of the HTTP API [default 127.0.0.1:7080; env KAIROS_LISTEN].
    #[arg(long)]
    listen: Option<String>,
    /// Data directory for the event log and snapshots [default ./kairos-data; env KAIROS_DATA_DIR].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Event log backend [default embedded; env KAIROS_LOG].
    #[arg(long)]
    log: Option<String>,
    /// State backend [default embedded; env KAIROS_STATE].
    #[arg(long)]
    state: Option<String>,
    /// Load demo data (a catalogue and an event stream) into an empty data directory.
    #[arg(long)]
    demo: bool,
    /// Directory with events.csv and items.csv for --demo [default ../shared/data/movielens-small,
    /// else a generated shop].
    #[arg(long)]
    demo_data: Option<PathBuf>,
}

fn flags_table(args: &ServeArgs) -> toml::Table {
    let mut t = toml::Table::new();
    let mut set = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            t.insert(k.into(), toml::Value::String(v));
        }
    };
    set("listen", args.listen.clone());
    set(
        "data_dir",
        args.data_dir.as_ref().map(|p| p.display().to_string()),
    );
    set("log", args.log.clone());
    set("state", args.state.clone());
    t
}

/// `kairos eval`: the effective configuration (file, KAIROS_* variables), one protocol, the
/// table and, with `--json`, the JSON line.
fn run_eval(config_file: Option<&Path>, cmd: &EvalCommand) -> Result<(), String> {
    let c = config::load(config_file, std::env::vars(), toml::Table::new())?;
    let (report, common) = match cmd {
        EvalCommand::Sessions {
            train,
            test,
            common,
        } => (
            eval::run_sessions(&c.model, &c.recommend, train, test, &common.options())?,
            common,
        ),
        EvalCommand::Replay {
            events,
            items,
            test_events,
            score_from,
            common,
        } => {
            let input = ReplayInput {
                events: events.clone(),
                items: items.clone(),
                test_events: test_events.clone(),
                score_from: *score_from,
            };
            let report = eval::run_replay(&c.model, &c.recommend, &input, &common.options())?;
            (report, common)
        }
    };
    print!("{}", report.table());
    if common.json {
        println!("{}", report.json());
    }
    Ok(())
}

/// `kairos serve` and `kairos ingest`: the effective configuration, then the node until a signal.
fn run_node(config_file: Option<&Path>, args: ServeArgs, role: Role) -> Result<(), String> {
    let c = config::load(config_file, std::env::vars(), flags_table(&args))?;
    serve::init_tracing(&c.log_format, &c.log_level);
    serve::run(
        c,
        ServeOptions {
            role,
            demo: args.demo,
            demo_data: args.demo_data,
        },
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Config { default: true } => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Config { default: false } => {
            config::load(cli.config.as_deref(), std::env::vars(), toml::Table::new()).and_then(
                |c| {
                    toml::to_string(&c)
                        .map(|s| print!("{s}"))
                        .map_err(|e| e.to_string())
                },
            )
        }
        Command::Serve(args) => run_node(cli.config.as_deref(), args, Role::All),
        Command::Ingest(args) => run_node(cli.config.as_deref(), args, Role::Ingest),
        Command::Process(args) => run_node(cli.config.as_deref(), args, Role::Process),
        Command::Api(args) => run_node(cli.config.as_deref(), args, Role::Api),
        Command::Eval(cmd) => run_eval(cli.config.as_deref(), &cmd),
        Command::Load(args) => std::fs::read_to_string(&args.paths)
            .map_err(|e| format!("reading {}: {e}", args.paths.display()))
            .and_then(|text| {
                let paths: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
                kairos::bench::drive(
                    args.addr,
                    paths,
                    args.rate,
                    std::time::Duration::from_secs_f64(args.seconds.max(0.1)),
                    args.connections,
                )
            })
            .map(|json| println!("{json}")),
        Command::Bench(args) => {
            let options = kairos::bench::BenchOptions {
                quick: args.quick,
                scenarios: args.scenario,
                config: cli.config.clone(),
                dir: args.dir,
                seed: args.seed,
                keep: args.keep,
            };
            kairos::bench::run(&options).map(|report| {
                print!("{}", report.table());
                if args.json {
                    println!("{}", report.json());
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kairos: {e}");
            ExitCode::FAILURE
        }
    }
}
