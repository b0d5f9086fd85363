"""The bureau side: the coordinator's ServerApp (federated training, encrypted queries)."""
