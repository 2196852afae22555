"""Relax graph rewrites: layouts, precision, WGSL legalisation, fusion, memory planning."""
