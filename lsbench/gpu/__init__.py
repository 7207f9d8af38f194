"""The prepared GPU run: `make gpu-check` (check), `make gpu-bundle` (bundle) and the
offline installer (install, standard library only). Importing this package imports nothing."""
