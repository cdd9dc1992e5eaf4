"""Pure planning core: estimator, planner, tuner policies. No network, no framework imports."""
