"""Memory: the analytic estimator against measured peaks."""
