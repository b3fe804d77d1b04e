"""Recording a run while it trains: the callback, batch membership, the run's files, training several seeds."""
