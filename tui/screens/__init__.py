"""The TUI's screens. The app's `SCREENS` table names each one; later screens (features, monitor,
steer) join that table and the command palette with their own bindings."""
