"""megatron_sl.cli: the ``megatron-sl`` command and its subcommands (top of the layering)."""
