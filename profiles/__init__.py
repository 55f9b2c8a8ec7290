"""The shipped device profiles, installed as the package `edgepaged.profiles_data`.

The YAML files are package data, so a wheel or a non-editable install finds them where
`edgepaged.profiles.PROFILES_DIR` looks, not in a source tree the box may not have.
"""
