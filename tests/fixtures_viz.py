"""Fixtures: small circuit stores in the released viz_data format, and tables built from them."""
