"""The TUI's screens. The app opens each one from its actions (`MistudioApp.action_*`,
`open_job`), which the command palette lists too; later screens (features, monitor, steer) join
them there with their own bindings."""
