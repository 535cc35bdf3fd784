pub fn run(_: &Options) -> anyhow::Result<()> {
    Ok(())
}
#[derive(clap::Args)]
pub struct Options {}
