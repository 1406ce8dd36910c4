/// A resource an appliance has: how much in all and how much is free.
public struct Capacity: Codable, Sendable, Equatable {
    public var total: Int
    public var free: Int

    public init(total: Int, free: Int) {
        self.total = total
        self.free = free
    }
}

/// What an appliance's hypervisor has, as it reports at each check-in.
public struct HypervisorStats: Codable, Sendable, Equatable {
    public var vcpus: Capacity
    /// Memory in MiB.
    public var memoryMiB: Capacity
    /// Disk for instances in GiB.
    public var diskGiB: Capacity
    /// How many instances run now.
    public var running: Int

    enum CodingKeys: String, CodingKey {
        case vcpus
        case memoryMiB = "memory_mib"
        case diskGiB = "disk_gib"
        case running
    }

    public init(vcpus: Capacity, memoryMiB: Capacity, diskGiB: Capacity, running: Int) {
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.diskGiB = diskGiB
        self.running = running
    }
}

/// One line of an appliance's instance summary.
public struct InstanceSummary: Codable, Sendable, Equatable {
    public var name: String
    public var state: InstanceState

    public init(name: String, state: InstanceState) {
        self.name = name
        self.state = state
    }
}

/// `POST /api/v1/broker/`: an appliance's periodic check-in.
public struct CheckInRequest: Codable, Sendable, Equatable {
    public var appliance: ApplianceBlock
    public var stats: HypervisorStats
    /// Every instance the appliance holds, with its state.
    public var instances: [InstanceSummary]
    /// Ids of actions the appliance has applied (or given up on) since its
    /// last check-in; the pool stops sending them.
    public var done: [String]
    /// Long polling: while no action is pending, the pool holds its reply
    /// up to this many seconds and answers as soon as one is queued
    /// (nil or 0: answer at once).
    public var holdSeconds: Int?

    public init(
        appliance: ApplianceBlock, stats: HypervisorStats, instances: [InstanceSummary] = [], done: [String] = [],
        holdSeconds: Int? = nil
    ) {
        self.appliance = appliance
        self.stats = stats
        self.instances = instances
        self.done = done
        self.holdSeconds = holdSeconds
    }

    enum CodingKeys: String, CodingKey {
        case appliance, stats, instances, done
        case holdSeconds = "hold_seconds"
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        appliance = try container.decode(ApplianceBlock.self, forKey: .appliance)
        stats = try container.decode(HypervisorStats.self, forKey: .stats)
        instances = try container.decodeIfPresent([InstanceSummary].self, forKey: .instances) ?? []
        done = try container.decodeIfPresent([String].self, forKey: .done) ?? []
        holdSeconds = try container.decodeIfPresent(Int.self, forKey: .holdSeconds)
    }
}

/// Something the pool wants an appliance to do to one instance.
public struct Action: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable, CaseIterable {
        /// Build and boot a new instance (its start parameters come from
        /// the instance report, as for any other instance).
        case start
        case reboot
        case powerOn = "power_on"
        case powerOff = "power_off"
        /// Decommission: destroy the VM and delete its disks.
        case delete
        /// The lease now ends at `expires`.
        case lease
        /// Replace the login user's SSH keys in the running guest with
        /// `keys` (through the QEMU guest agent), then start `run` once.
        case keys
    }

    /// Unique; the pool sends an action at every check-in until the
    /// appliance lists its id in `done`, so the agent applies each id once.
    public var id: String
    public var kind: Kind
    public var instance: String
    /// For `start`: the size to build.
    public var flavor: InstanceFlavor?
    /// For `start` and `lease`: when the lease ends, in Unix seconds (nil: never).
    public var expires: Int?
    /// For `start`: the launch phases the pool recorded (the request and
    /// the placement), so the agent's timeline starts where the pool's does.
    public var timeline: [TimelineEntry]?
    /// For `keys`: every public key (`authorized_keys` lines) the login
    /// user is to have, replacing what it has.
    public var keys: [String]?
    /// For `keys`: the guest user whose keys they are (the image's login user).
    public var user: String?
    /// For `keys`: a `#!` script to start once in the guest afterwards (a
    /// warm instance's new owner's user-data).
    public var run: String?

    public init(
        id: String, kind: Kind, instance: String, flavor: InstanceFlavor? = nil, expires: Int? = nil,
        timeline: [TimelineEntry]? = nil, keys: [String]? = nil, user: String? = nil, run: String? = nil
    ) {
        self.id = id
        self.kind = kind
        self.instance = instance
        self.flavor = flavor
        self.expires = expires
        self.timeline = timeline
        self.keys = keys
        self.user = user
        self.run = run
    }
}

/// The pool's reply to a check-in.
public struct CheckInResult: Codable, Sendable, Equatable {
    /// What to do, oldest first.
    public var actions: [Action]

    public init(actions: [Action]) { self.actions = actions }
}
