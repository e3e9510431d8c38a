if __name__ == "__main__":  # spawned CRF workers import this module too: they must neither run the check
    from construct_lab.gpu_check.runner import main  # nor pay for importing it

    main()
