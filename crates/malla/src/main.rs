//! `malla`: one binary for the whole mesh: `malla proxy`, the sidecar; `malla control`,
//! the control plane, and the verbs that talk to it (registry, policies, events);
//! `malla demo`, which shows them at work.

// The binary is where malla talks to people: printing to stdout is its job.
#![allow(clippy::print_stdout)]

mod authz_cmd;
mod client;
mod control_cmd;
mod demo;
mod describe_cmd;
mod get_cmd;
mod identity_cmd;
mod operator_cmd;
mod output;
mod policy_cmd;
mod proxy_cmd;
mod register_cmd;
mod registry_cmd;
mod yaml;

use std::process::ExitCode;

use clap::{parser::ValueSource, CommandFactory as _, FromArgMatches as _, Subcommand};

#[derive(clap::Parser)]
#[command(name = "malla", version, about = "malla: a service mesh in one binary")]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `malla_proxy=debug` (also RUST_LOG). Default:
    /// `info` for the proxy and the control plane, `warn` for the other commands.
    #[arg(long, global = true, env = "MALLA_LOG")]
    log: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy.
    Proxy(proxy_cmd::ProxyArgs),
    /// Run the control plane (registry, health checks, HTTP and gRPC APIs, DNS).
    Control(control_cmd::ControlArgs),
    /// Show resources: `get services`, `get service NAME`, `get instances SERVICE`,
    /// `get policies`, `get policy NAME`, `get authorizations`, `get authorization NAME`,
    /// `get proxies`.
    Get(get_cmd::GetArgs),
    /// Show everything about one resource: `describe service NAME`.
    Describe(describe_cmd::DescribeArgs),
    /// Delete a resource: `delete service NAME`, `delete policy NAME`, `delete
    /// authorization NAME`.
    Delete(get_cmd::DeleteArgs),
    /// Set or remove annotations: `annotate service NAME KEY=VALUE... KEY-`.
    Annotate(get_cmd::AnnotateArgs),
    /// Register an instance (with --keep-alive, kept alive by heartbeats until Ctrl-C or
    /// SIGTERM; with --static, kept until deregistered).
    Register(register_cmd::RegisterArgs),
    /// Remove an instance from the registry at once.
    Deregister(registry_cmd::DeregisterArgs),
    /// Apply resilience and authorization policies from TOML files (all checked before any
    /// is applied).
    Apply(policy_cmd::ApplyArgs),
    /// Show the events the control plane and sidecars reported (ejections, limits hit,
    /// health changes...), newest last.
    Events(policy_cmd::EventsArgs),
    /// List the services in the registry (the same as `get services`).
    Services(registry_cmd::ServicesArgs),
    /// List the instances of a service (the same as `get instances SERVICE`).
    Instances(registry_cmd::InstancesArgs),
    /// Join tokens for sidecars: `token create --service NAME [--ttl 1h]`.
    Token(identity_cmd::TokenArgs),
    /// The mesh's trust domain, trust bundle (`--bundle`: the PEM alone), roots and root
    /// rotation; `identity rotate`: rotate the root.
    Identity(identity_cmd::IdentityArgs),
    /// The operator token of the control plane's HTTP API: `operator-token rotate`.
    OperatorToken(operator_cmd::OperatorTokenArgs),
    /// Start demo services behind sidecars (mTLS between them), send traffic, and show
    /// where it went.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    client::set_control_from_env(control_from_env(&matches));
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let default_log = match cli.command {
        Command::Proxy(_) | Command::Control(_) => "info",
        // The CLI verbs and the demo speak through their output, not logs.
        _ => "warn",
    };
    init_logging(cli.log.as_deref().unwrap_or(default_log));
    let result = match cli.command {
        Command::Proxy(args) => proxy_cmd::run(args),
        Command::Control(args) => control_cmd::run(args),
        Command::Services(args) => registry_cmd::services(args),
        Command::Instances(args) => registry_cmd::instances(args),
        Command::Register(args) => register_cmd::register(args),
        Command::Deregister(args) => registry_cmd::deregister(args),
        Command::Apply(args) => policy_cmd::apply(args),
        Command::Get(args) => get_cmd::get(args),
        Command::Describe(args) => describe_cmd::describe(args),
        Command::Delete(args) => get_cmd::delete(args),
        Command::Annotate(args) => get_cmd::annotate(args),
        Command::Events(args) => policy_cmd::events(args),
        Command::Token(args) => identity_cmd::token(args),
        Command::Identity(args) => identity_cmd::identity(args),
        Command::OperatorToken(args) => operator_cmd::operator_token(args),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`malla services | head -2`): stop quietly,
        // as `ls | head` does.
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            output::errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the verb's `--control` value came from `MALLA_CONTROL` (so that its errors
/// name the variable, not a flag the user never typed).
fn control_from_env(matches: &clap::ArgMatches) -> bool {
    let mut leaf = matches;
    while let Some((_, sub)) = leaf.subcommand() {
        leaf = sub;
    }
    leaf.try_contains_id("control").unwrap_or(false)
        && leaf.value_source("control") == Some(ValueSource::EnvVariable)
}

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR"),
        ))
        .init();
}

/// Colour only for a person at a terminal: not in a file or a pipe (a log collector
/// would keep the escapes), and not when NO_COLOR is set to anything but "" (no-color.org).
fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn colour_only_at_a_terminal_without_no_color() {
        assert!(super::colour(true, None));
        assert!(super::colour(true, Some("".into())));
        assert!(!super::colour(true, Some("1".into())));
        assert!(!super::colour(false, None));
    }
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory as _;

    /// Every flag and argument of every command says what it is for in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "malla", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
