import ArgumentParser
import Foundation
import Libvirt

extension Corral {
    struct Host: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Facts about the libvirt host.",
            subcommands: [Info.self, VirtType.self]
        )
    }
}

extension VirtualizationType: ExpressibleByArgument {}

extension Corral.Host {
    struct Info: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the host's libvirt, QEMU, CPUs and memory.")

        @OptionGroup var libvirt: LibvirtOptions

        @Flag(help: "Print JSON.")
        var json = false

        struct Facts: Encodable {
            var uri: String
            var hostname: String
            var libvirtVersion: String
            var hypervisorVersion: String
            var node: NodeInfo
        }

        func run() async throws {
            try await libvirt.withConnection { connection in
                let facts = Facts(
                    uri: libvirt.uri,
                    hostname: try await connection.hostname(),
                    libvirtVersion: try await connection.libvirtVersion(),
                    hypervisorVersion: try await connection.hypervisorVersion(),
                    node: try await connection.nodeInfo())
                if json { return try printJSON(facts) }
                print("""
                    URI:         \(facts.uri)
                    Host:        \(facts.hostname)
                    libvirt:     \(facts.libvirtVersion)
                    Hypervisor:  \(facts.hypervisorVersion)
                    CPUs:        \(facts.node.cpus) (\(facts.node.model), \(facts.node.mhz) MHz)
                    Memory:      \(facts.node.memoryKiB / 1024) MiB
                    """)
            }
        }
    }

    struct VirtType: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "virt-type",
            abstract: "Resolve the virtualisation type setting (auto proves KVM with a probe guest).")

        @OptionGroup var libvirt: LibvirtOptions

        @Option(help: "The setting to resolve: auto, kvm or qemu.")
        var setting: VirtualizationType = .auto

        @Option(help: "How long the KVM probe guest may take, in seconds.")
        var timeout = 10

        @Option(help: "A directory the hypervisor can read, for the probe kernel.")
        var workDirectory = "/var/lib/corral/probe"

        func validate() throws {
            guard (1...120).contains(timeout) else {
                throw ValidationError("--timeout must be between 1 and 120 seconds (it was \(timeout)).")
            }
        }

        func run() async throws {
            try await libvirt.withConnection { connection in
                let resolved = await connection.resolveVirtualization(
                    setting, workDirectory: URL(fileURLWithPath: workDirectory), timeout: .seconds(timeout))
                print("\(resolved.type)\t\(resolved.reason)")
            }
        }
    }
}
