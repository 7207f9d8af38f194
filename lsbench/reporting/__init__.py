"""Tables and figures from results and scan files."""
