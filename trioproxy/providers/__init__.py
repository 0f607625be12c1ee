"""Providers: one sans-IO translation per upstream protocol."""
