fn main() -> anyhow::Result<()> {
    redirect_agent::cli::main()
}
