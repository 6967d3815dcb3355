"""What the configurator reasons with: hardware profiles, workload profiles and the latency model."""
