pub fn demo() -> anyhow::Result<()> {
    todo!()
}
