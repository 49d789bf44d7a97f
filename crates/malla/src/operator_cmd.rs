//! `malla operator-token rotate`: a new operator token for the control plane's HTTP API,
//! the old one refused at once.

use http::Method;

use crate::{
    client::Client,
    output::outln,
    registry_cmd::{Common, Output},
};

#[derive(clap::Args)]
pub struct OperatorTokenArgs {
    #[command(subcommand)]
    what: OperatorTokenWhat,
}

#[derive(clap::Subcommand)]
enum OperatorTokenWhat {
    /// Replace the operator token: the control plane makes a new one, writes it over
    /// DATA_DIR/operator.token and refuses the old one from now on.
    #[command(after_help = "Examples:\n  \
        malla operator-token rotate\n  \
        export MALLA_TOKEN=$(malla operator-token rotate)\n\n\
        The new token alone on stdout, where it is kept on stderr (-o json: the API's answer).\n\
        A CLI on the control plane's machine reading DATA_DIR/operator.token needs no step;\n\
        everyone else needs the new token.")]
    Rotate {
        #[command(flatten)]
        common: Common,
    },
}

pub fn operator_token(args: OperatorTokenArgs) -> anyhow::Result<()> {
    let OperatorTokenWhat::Rotate { common } = args.what;
    let client = Client::new(&common.control)?;
    let v = client.call(Method::POST, "/v1/operator-token/rotate", None)?;
    match common.output {
        Output::Json => crate::output::print_json(&v)?,
        Output::Yaml => crate::yaml::print(&v)?,
        // The token alone on stdout, so that `MALLA_TOKEN=$(malla operator-token rotate)`
        // works.
        Output::Table | Output::Wide => {
            outln!("{}", crate::output::text(&v["token"]))?;
            crate::output::errln!(
                "operator token rotated: the old one is refused from now on; the new one is kept in {} on the control plane's machine",
                crate::output::text(&v["file"])
            );
        }
    }
    Ok(())
}
