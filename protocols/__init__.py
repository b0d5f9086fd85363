"""What the bureau and the platforms share: identity tokens, encryption, message formats.

Every module here opens with what it guarantees, what it assumes and what it does not
protect, because both sides of the federation depend on these promises.
"""
