"""Engine replicas outside the gateway process, behind the same `EngineClient` interface as the local engine."""
