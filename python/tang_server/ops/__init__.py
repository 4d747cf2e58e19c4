"""Operations: metrics, recovery usage and its ledger, guarded retirement, fleet and Kubernetes tooling."""
