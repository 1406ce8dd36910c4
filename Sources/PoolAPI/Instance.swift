/// An instance's state, numbered as both sides of the protocol number it.
public enum InstanceState: Int, Codable, Sendable, CaseIterable, CustomStringConvertible {
    case inactive = 0
    case onOffer = 1
    /// Paid or leased, to be started.
    case leased = 2
    case starting = 3
    case running = 4
    case suspended = 5
    /// Paid while suspended, to be resumed.
    case leasedWhileSuspended = 6
    case decommissioned = 7

    public var description: String {
        switch self {
        case .inactive: "inactive"
        case .onOffer: "on offer"
        case .leased: "leased"
        case .starting: "starting"
        case .running: "running"
        case .suspended: "suspended"
        case .leasedWhileSuspended: "leased while suspended"
        case .decommissioned: "decommissioned"
        }
    }
}

/// One IP address of an instance.
public struct IPAddress: Codable, Sendable, Equatable {
    /// 4 or 6.
    public var version: Int
    /// `public` or `private`.
    public var scope: String
    public var address: String

    public init(version: Int, scope: String, address: String) {
        self.version = version
        self.scope = scope
        self.address = address
    }
}

/// The size an instance runs with, as the appliance reports it.
public struct InstanceFlavor: Codable, Sendable, Equatable {
    public var name: String?
    public var vcpus: Int
    /// Memory in MiB.
    public var memory: Int
    /// Disk in GiB.
    public var disk: Int

    public init(name: String? = nil, vcpus: Int, memory: Int, disk: Int) {
        self.name = name
        self.vcpus = vcpus
        self.memory = memory
        self.disk = disk
    }
}

/// What an appliance reports about one of its instances.
public struct InstanceReport: Codable, Sendable, Equatable {
    /// The instance's name; must equal the name in the request's URI.
    public var name: String
    public var state: InstanceState
    public var flavor: InstanceFlavor?
    /// Asking price per hour.
    public var ask: Int?
    /// When the lease ends, in Unix seconds.
    public var expires: Int?
    /// A payment address, if the appliance takes payments itself.
    public var address: String?
    public var ipAddresses: [IPAddress]?
    /// The newest lines of the serial console.
    public var consoleOutput: [String]?
    /// Why the instance failed (a build step, the boot, a power action);
    /// nil when nothing is wrong. The pool keeps the newest.
    public var error: String?
    /// The hypervisor's word for the state, e.g. `shut off (shutdown)` or
    /// `paused (user)`, when the state alone does not say it.
    public var reason: String?
    /// When the instance reached each launch phase so far, as the agent
    /// saw it (the pool keeps the phases it records itself).
    public var timeline: [TimelineEntry]?
    /// Where users reach its SSH server (a Corral addition): the forward
    /// on the appliance, or the guest's address in network and bridge modes.
    public var ssh: SSHEndpoint?
    /// The id of the newest `keys` action carried out in the guest (a
    /// Corral addition); a failure shows in `error`.
    public var keysApplied: String?

    enum CodingKeys: String, CodingKey {
        case name, state, flavor, ask, expires, address
        case ipAddresses = "ip_addresses"
        case consoleOutput = "console_output"
        case error, reason, timeline, ssh
        case keysApplied = "keys_applied"
    }

    public init(
        name: String, state: InstanceState, flavor: InstanceFlavor? = nil, ask: Int? = nil, expires: Int? = nil,
        address: String? = nil, ipAddresses: [IPAddress]? = nil, consoleOutput: [String]? = nil, error: String? = nil,
        reason: String? = nil, timeline: [TimelineEntry]? = nil, ssh: SSHEndpoint? = nil, keysApplied: String? = nil
    ) {
        self.ssh = ssh
        self.keysApplied = keysApplied
        self.name = name
        self.state = state
        self.flavor = flavor
        self.ask = ask
        self.expires = expires
        self.address = address
        self.ipAddresses = ipAddresses
        self.consoleOutput = consoleOutput
        self.error = error
        self.reason = reason
        self.timeline = timeline
    }
}

/// `POST /api/v1/instances/<name>/`: an appliance reports an instance.
public struct InstanceReportRequest: Codable, Sendable, Equatable {
    public var appliance: ApplianceBlock
    public var instance: InstanceReport

    public init(appliance: ApplianceBlock, instance: InstanceReport) {
        self.appliance = appliance
        self.instance = instance
    }
}

/// The image an instance boots from.
public struct ImageReference: Codable, Sendable, Equatable {
    public var name: String
    public var url: String
    /// Hex SHA-256 of the image file, when the pool knows it.
    public var sha256: String?
    /// Always `bare`: the file is the disk image itself.
    public var containerFormat: String
    /// `qcow2` or `raw`.
    public var diskFormat: String
    /// For an image without a boot loader: the kernel and initrd the
    /// appliance boots it with.
    public var kernelBoot: KernelBoot?

    enum CodingKeys: String, CodingKey {
        case name, url, sha256
        case containerFormat = "container_format"
        case diskFormat = "disk_format"
        case kernelBoot = "kernel_boot"
    }

    /// Reads an image reference; `container_format` defaults to `bare`.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        name = try container.decode(String.self, forKey: .name)
        url = try container.decode(String.self, forKey: .url)
        sha256 = try container.decodeIfPresent(String.self, forKey: .sha256)
        containerFormat = try container.decodeIfPresent(String.self, forKey: .containerFormat) ?? "bare"
        diskFormat = try container.decode(String.self, forKey: .diskFormat)
        kernelBoot = try container.decodeIfPresent(KernelBoot.self, forKey: .kernelBoot)
    }

    public init(
        name: String, url: String, sha256: String? = nil, containerFormat: String = "bare", diskFormat: String,
        kernelBoot: KernelBoot? = nil
    ) {
        self.name = name
        self.url = url
        self.sha256 = sha256
        self.containerFormat = containerFormat
        self.diskFormat = diskFormat
        self.kernelBoot = kernelBoot
    }
}

/// A file the appliance downloads: where from, and its SHA-256 when known.
public struct RemoteFile: Codable, Sendable, Equatable {
    public var url: String
    /// Hex SHA-256; the appliance refuses a file that does not match.
    public var sha256: String?

    public init(url: String, sha256: String? = nil) {
        self.url = url
        self.sha256 = sha256
    }
}

/// Direct kernel boot: the image is a root file system without a boot
/// loader, booted with this kernel, initrd and command line.
public struct KernelBoot: Codable, Sendable, Equatable {
    public var kernel: RemoteFile
    public var initrd: RemoteFile?
    /// The kernel command line, e.g. `root=/dev/vda console=ttyS0 rw no_timer_check`.
    public var cmdline: String

    public init(kernel: RemoteFile, initrd: RemoteFile? = nil, cmdline: String = "") {
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
    }
}

/// How to boot an instance: the pool's reply to an instance report.
public struct StartParameters: Codable, Sendable, Equatable {
    public var image: ImageReference
    /// Where the appliance asks next for start parameters ("" for none).
    public var callbackURL: String
    /// SSH public keys for the guest's default user, one per line.
    public var sshKeys: [String]
    /// The post-creation script or cloud-config, line by line.
    public var postCreate: [String]
    /// The instance owner's own part (a Corral addition): a `#cloud-config`
    /// document or a `#!` script, run after `post_create`.
    public var userData: String?

    enum CodingKeys: String, CodingKey {
        case image
        case callbackURL = "callback_url"
        case sshKeys = "ssh_keys"
        case postCreate = "post_create"
        case userData = "user_data"
    }

    /// Reads start parameters; only `image` is required (a callback may
    /// leave out the rest).
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        image = try container.decode(ImageReference.self, forKey: .image)
        callbackURL = try container.decodeIfPresent(String.self, forKey: .callbackURL) ?? ""
        sshKeys = try container.decodeIfPresent([String].self, forKey: .sshKeys) ?? []
        postCreate = try container.decodeIfPresent([String].self, forKey: .postCreate) ?? []
        userData = try container.decodeIfPresent(String.self, forKey: .userData)
    }

    public init(
        image: ImageReference, callbackURL: String = "", sshKeys: [String] = [], postCreate: [String] = [], userData: String? = nil
    ) {
        self.image = image
        self.callbackURL = callbackURL
        self.sshKeys = sshKeys
        self.postCreate = postCreate
        self.userData = userData
    }
}
