"""The TUI's widgets: each draws one part of the daemon's state from `tui.state.DaemonState`."""
