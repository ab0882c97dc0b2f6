"""Automated seats: bot policies (offline scripted backend, later LLMs) and synthetic humans."""
