import Foundation
import PoolAPI

/// The user-facing API's views of the pool's records.
extension ServerInstance {
    public init(_ instance: Instance) {
        func address(_ scope: String) -> String? {
            let matching = instance.ipAddresses.filter { $0.scope == scope }
            return (matching.first { $0.version == 4 } ?? matching.first)?.address
        }
        self.init(
            id: instance.id, cloudauthID: instance.ownerID, users: instance.users, serverImage: instance.image ?? "",
            serverFlavor: instance.flavor?.name ?? "", creationDate: Self.timestamp(instance.createdAt),
            status: Self.status(of: instance), hostname: instance.name, publicIP: address("public"), privateIP: address("private"),
            lastError: instance.lastError,
            ssh: instance.state == .decommissioned
                ? nil : instance.ssh.map { ServerSSHEndpoint(host: $0.host, port: $0.port, user: instance.loginUser) })
    }

    /// The API document's word for an instance's state:
    ///
    /// | Corral                                      | status      |
    /// |---------------------------------------------|-------------|
    /// | 7 decommissioned                            | `DELETED`   |
    /// | an error reported (build, boot, power)      | `ERROR`     |
    /// | 2 leased, 3 starting; a warm hand-out whose  | `BUILD`     |
    /// |   new owner's keys are not yet in the guest  |             |
    /// | 1 on offer, 4 running                       | `ACTIVE`    |
    /// | 5 or 6 with reason "shut off ...", 0 inactive | `SHUTOFF` |
    /// | 5 or 6 otherwise (paused: lease ended, ...)  | `SUSPENDED` |
    public static func status(of instance: Instance) -> String {
        if instance.state == .decommissioned { return "DELETED" }
        if instance.lastError != nil { return "ERROR" }
        // A warm instance stays BUILD to its new owner until its keys are theirs.
        if instance.rekeying { return "BUILD" }
        switch instance.state {
        case .leased, .starting: return "BUILD"
        case .onOffer, .running: return "ACTIVE"
        case .inactive: return "SHUTOFF"
        case .suspended, .leasedWhileSuspended:
            return instance.stateReason?.hasPrefix("shut off") == true ? "SHUTOFF" : "SUSPENDED"
        case .decommissioned: return "DELETED"
        }
    }
}

extension ServerFlavor {
    init(_ flavor: Flavor) {
        self.init(
            id: flavor.name, name: flavor.name, description: flavor.description, vcpus: flavor.vcpus, memoryMiB: flavor.memory,
            diskGiB: flavor.disk)
    }
}

extension ServerImage {
    init(_ image: Image) {
        self.init(id: image.name, name: image.name, diskFormat: image.diskFormat)
    }
}
