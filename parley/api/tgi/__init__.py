"""TGI-native routes."""
