"""One module per `hkft` command, each a thin layer over the library; hkft/cli.py registers them."""
