"""The platform side: the ClientApp that answers the bureau, and the ledger it reads."""
