//! `mimi-relay`: run a relay node, generate certificates, or run the three-provider demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use mimi_lab::demo::{self, DemoOptions, Launcher};

// The relay allocates and frees a ~1 KiB buffer per message; glibc's malloc spends a fifth of
// the routing core's time on that (perf, routing bench), mimalloc much less.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "mimi-relay",
    version,
    about = "A relay for MIMI traffic over pluggable transports"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one relay node until SIGTERM.
    Run {
        /// The node's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a node configuration and exit.
    CheckConfig { config: PathBuf },
    /// Dial every configured peer as the node would and report, per peer, the TLS identity
    /// verified and how, the directory, the sequence extension, the round-trip time and what
    /// is wrong. Exit status 1 if any peer has a fault.
    CheckPeers {
        /// The node's TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// Print one JSON object instead of the report.
        #[arg(long)]
        json: bool,
        /// Bound on each step (connect, handshake, each request); a peer takes at most three
        /// times this.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Make a certificate and key for each provider domain: self-signed, or issued by a new
    /// local CA (--ca).
    Keygen {
        /// Provider domains, e.g. a.example b.example.
        #[arg(required = true)]
        domains: Vec<String>,
        /// Directory to write DOMAIN.crt and DOMAIN.key into.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
        /// Issue the certificates from a new local CA named NAME, written to NAME.crt for
        /// peers to configure as `ca` (its key is not kept).
        #[arg(long, value_name = "NAME")]
        ca: Option<String>,
    },
    /// Act as a local client of a running node (its loopback API, `node.admin`).
    Client {
        /// The node's admin address, e.g. 127.0.0.1:9102.
        #[arg(long)]
        admin: std::net::SocketAddr,
        #[command(subcommand)]
        action: ClientCmd,
    },
    /// Work with MIMI content (draft-ietf-mimi-content-08) files.
    Content {
        #[command(subcommand)]
        action: mimi_relay::content::ContentCmd,
    },
    /// Compare the transports under the same load and network conditions (the transport lab).
    Bench(Box<mimi_lab::BenchArgs>),
    /// Start three providers on loopback, run a room across them and report what arrived.
    Demo {
        /// Messages to submit, spread over the three providers.
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        /// Transport between the providers: quic, https, xmpp, matrix, or mixed (the default:
        /// a-b over QUIC, a-c over HTTPS, b-c over XMPP).
        #[arg(long, default_value = "mixed")]
        transport: String,
        /// Where nodes keep their state: durable (redb, fsync per commit) or memory.
        #[arg(long, default_value = "durable")]
        store: String,
        /// Print one JSON object instead of the summary.
        #[arg(long)]
        json: bool,
        /// Kill a follower's process (b.example) with SIGKILL twice during the run and restart it.
        #[arg(long)]
        chaos: bool,
        /// Which provider --chaos kills: a (the hub), b or c.
        #[arg(long, default_value = "b", value_parser = ["a", "b", "c"])]
        chaos_victim: String,
        /// Senders per provider.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Keep the working directory (configs, certificates, stores, logs).
        #[arg(long)]
        keep: bool,
        /// Use this working directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// What to run: both (the MLS room scenario, then the opaque-payload load), mls, or
        /// load.
        #[arg(long, default_value = "both", value_parser = ["both", "mls", "load"])]
        mode: String,
    },
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Submit a text as an application message (wrapped in an MLS PrivateMessage frame; the
    /// relay never decrypts, so the demo payload is the text itself).
    Send {
        #[arg(long)]
        room: String,
        /// The sending user's URI; it must belong to the node's provider.
        #[arg(long)]
        from: String,
        text: String,
    },
    /// Print the events delivered to this provider after OFFSET (and let the node forget those
    /// up to it).
    Inbox {
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Wait this long for the first event.
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Run { config } => {
            init_tracing();
            relay_node::run(&config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckConfig { config } => {
            let c = relay_node::NodeConfig::load(&config)?;
            println!(
                "{}: ok ({} as {}, {} peers, {} hosted rooms)",
                config.display(),
                c.domain,
                if c.rooms.is_empty() {
                    "follower"
                } else {
                    "hub"
                },
                c.peers.len(),
                c.rooms.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckPeers {
            config,
            json,
            timeout_ms,
        } => {
            let cfg = relay_node::NodeConfig::load(&config)?;
            let opts = mimi_relay::check_peers::CheckOptions {
                timeout: Duration::from_millis(timeout_ms.max(1)),
            };
            let report = mimi_relay::check_peers::run(&cfg, opts).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Client { admin, action } => {
            mimi_relay::client::run(admin, action.into()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Content { action } => {
            mimi_relay::content::run(action)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keygen {
            domains,
            out,
            force,
            ca,
        } => {
            for p in mimi_relay::keygen::keygen(&domains, &out, force, ca.as_deref())? {
                println!("wrote {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(args) => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let clean = mimi_lab::main(*args, command).await?;
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Demo {
            messages,
            transport,
            store,
            json,
            chaos,
            chaos_victim,
            clients,
            keep,
            dir,
            mode,
        } => {
            let opts = DemoOptions {
                messages: if mode == "mls" { 0 } else { messages },
                mls: mode != "load",
                transport,
                store,
                chaos,
                chaos_node: match chaos_victim.as_str() {
                    "a" => 0,
                    "c" => 2,
                    _ => 1,
                },
                clients: clients.max(1),
                dir,
                keep,
                settle: Duration::from_secs(60),
                progress: !json,
                ..DemoOptions::default()
            };
            if !json {
                eprintln!(
                    "starting a.example (hub), b.example and c.example over {}{} ...",
                    opts.transport,
                    if chaos { ", with chaos" } else { "" }
                );
                if (opts.transport == "quic" || opts.transport == "mixed")
                    && let Some(note) = demo::udp_buffer_note()
                {
                    eprintln!("{note}");
                }
            }
            let report = demo::run(opts, Launcher::this_binary()?).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                eprintln!();
                print!("{}", report.summary());
            }
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

impl From<ClientCmd> for mimi_relay::client::Action {
    fn from(c: ClientCmd) -> Self {
        match c {
            ClientCmd::Send { room, from, text } => Self::Send { room, from, text },
            ClientCmd::Inbox { after, wait_ms } => Self::Inbox { after, wait_ms },
        }
    }
}
