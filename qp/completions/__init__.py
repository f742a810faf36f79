"""completions"""
