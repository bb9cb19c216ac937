"""One module per ``esmjax`` subcommand: argv -> config -> one library call."""
