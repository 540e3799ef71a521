// SPDX-License-Identifier: GPL-3.0-or-later
// The test contract for tests/test_wallet.py: deployed and called through the wallet endpoint.
pragma solidity ^0.8.20;

contract Counter {
    uint256 public count;
    event Bumped(address indexed by, uint256 count);

    function bump(uint256 by) external {
        count += by;
        emit Bumped(msg.sender, count);
    }
}
