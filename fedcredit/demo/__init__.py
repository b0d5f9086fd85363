"""``fedcredit demo``: one command from nothing to a working federation, and a report that
shows people what it achieved (the model's quality against local-only and centralized
references and the Bayes bound, the encrypted queries, and what each stage cost).
"""
