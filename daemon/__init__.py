"""The locod daemon: serving loop, turns, backends, telemetry, decision log, configuration."""
