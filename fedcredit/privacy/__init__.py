"""Measured privacy: membership-inference attacks against trained credit models."""
