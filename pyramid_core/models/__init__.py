"""Model definitions with the official parameter names (state dicts load with no renaming)."""
