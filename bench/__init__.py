"""`karma bench`: the serving benchmark (load generator, naive baseline, index bench, report). See bench.runner."""
