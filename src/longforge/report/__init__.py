"""The report: plots and a markdown/HTML page a person can look at."""
